"""Fitting and measuring a model: contrastive training of the heads on cached frozen-tower
features, and the evaluation workflow (the 1K-test recall protocol on a caption dataset split)."""
