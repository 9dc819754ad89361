"""dllama-mpi: Distributed Llama re-implemented as an MPI SPMD program."""

__version__ = "0.1.0"
