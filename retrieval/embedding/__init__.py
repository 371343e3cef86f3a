"""The dual encoder onto the sphere: the packaged pretrained towers, the trained projection heads
(`SphereModel`), open_clip models behind the same interface, the model registry and its one
factory (`create_model`), checkpoints, and the query bank each model carries for the inverted
softmax. Nothing here knows about indexes, servers or training loops."""
