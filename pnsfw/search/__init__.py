"""FAISS index build/update/load and kNN queries over the store."""
