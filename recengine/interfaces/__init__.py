"""Layer 5, the interfaces: the command line (`cli`: parses, calls and prints), MLflow tracking and
the registry (`tracking`), and the MLflow pyfunc model logged as code (`mlflow_model`)."""
