"""Scene sources: one module per input format, each registered in :data:`segpipe.pipeline.read.SOURCES`."""
