"""Extra networks: the small files A1111 users add to a checkpoint (LoRAs, textual-inversion embeddings, VAEs)."""
