"""From files to vectors in bulk: image decoding with typed errors and bounded cost, caption-dataset
folders, the per-image / per-batch split of preprocessing, and streamed batch encoding (DataLoader
workers or encoder streams). Used by training, evaluation and the index builder alike."""
