"""The embedder: embeddings over the bus, micro-batched per model, with a cache shared by replicas."""
