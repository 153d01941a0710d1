import os

import pytest
from click.testing import CliRunner

# Where the encoder, tuning and adapter tests run their models: the CPU here and in CI;
# RECENGINE_TEST_DEVICE=cuda on a GPU machine runs the same tests on the CUDA paths (benchmarks/gpu/run.sh).
DEVICE = os.environ.get("RECENGINE_TEST_DEVICE", "cpu")


@pytest.fixture
def cli_run():
    """Invoke the recengine CLI in-process; returns the click Result."""
    from recengine.interfaces.cli import cli

    def run(*args: str):
        return CliRunner().invoke(cli, list(args))

    return run


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a of and space star war alien love story romance robot galaxy heart wedding comedy drama "
    "action adventure ship planet kiss paris summer night dark future time travel war"
).split()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT with a tiny vocabulary, saved as a local model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = list(dict.fromkeys(TINY_VOCAB))
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    # Under transformers 5, BertTokenizerFast(vocab_file=...) keeps only the special tokens, so every
    # title would be [UNK]s embedding to one vector; the vocabulary is given as a dict instead.
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    if len(tokenizer) < len(words):  # transformers 4 reads the file
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    # The fixture must give texts of different words different tokens, or no embedding test means anything.
    assert len({tuple(ids) for ids in tokenizer(["space dark", "love story"])["input_ids"]}) == 2
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(TINY_VOCAB)), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_encoder(tiny_bert):
    from recengine.parts.encoders import create_encoder

    return create_encoder("transformers", {"model": str(tiny_bert), "device": DEVICE})
