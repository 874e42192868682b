"""Images -> embeddings: sources, decode, encoder, projection, pipeline."""
