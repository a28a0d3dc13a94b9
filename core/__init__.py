"""chatstream: serve language models as multi-user streaming chat."""
