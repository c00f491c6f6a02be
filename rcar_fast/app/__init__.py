"""The application around the kernel library, imported on use (``import rcar_fast`` does not
load it): the release's full model and checkpoints (encoders), data (the precomp layout and
synthetic structured data), retrieval (all-pairs scoring, recall metrics, two-stage search) and
the command line (cli). It uses the library only through its public surface."""
