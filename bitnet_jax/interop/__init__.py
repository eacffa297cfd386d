"""Models outside training: run directories, Hugging Face checkpoints, packed ternary checkpoints."""
