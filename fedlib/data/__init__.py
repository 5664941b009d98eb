"""Text and records in, token blocks out: the corpus, a client's own files, partitions and the sealed shards."""
