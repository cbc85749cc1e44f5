"""The embedstream command line: starts the pipeline's processes."""
