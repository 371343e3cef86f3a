"""The inverted softmax over a bank of training queries (Smith et al., 2017; QB-Norm, Bogolin
et al., 2022): a query-time correction of hubness, the gallery items that many queries hit.

A gallery item g gets a bias from a bank of queries of the other modality:

    b_g = -(1/beta) * log mean_b exp(beta * cos(b, g))        (bank (B, D), beta > 0)

and cross-modal search ranks by cos(q, g) + b_g: that is the log of the inverted softmax
exp(beta cos(q, g)) / sum_b exp(beta cos(b, g)), divided by beta, up to a constant. A hub close
to many bank queries gets a low bias. b_g depends on g alone, so the index builder stores it as
a (D+1)-th coordinate of each gallery vector; a cross-modal query searches with [q, 1] (cosine
plus bias), any other query with [q, 0] (the plain cosine), in the same inner-product index.

The banks (captions and images of the training split, projected) and beta (chosen on dev) live
in the model as buffers, so evaluation, the index and the server apply the same correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrieval.hits import Modality
from retrieval.sphere.recall import recall_from_scores

CHUNK = 4096


def bias_from_bank(gallery: np.ndarray, bank: np.ndarray, beta: float) -> np.ndarray:
    """gallery (G, D), bank (B, D) unit rows -> (G,) float32 biases; zeros when beta is 0 or the
    bank is empty. Streams the gallery in chunks, so memory stays O(CHUNK * B)."""
    out = np.zeros(len(gallery), np.float32)
    if beta <= 0 or len(bank) == 0:
        return out
    bank_t = torch.from_numpy(np.ascontiguousarray(bank, np.float32))
    for s in range(0, len(gallery), CHUNK):
        cos = torch.from_numpy(np.ascontiguousarray(gallery[s : s + CHUNK], np.float32)) @ bank_t.T  # (g, B)
        lme = torch.logsumexp(beta * cos.double(), dim=1) - np.log(len(bank))  # log mean exp
        out[s : s + CHUNK] = (-lme / beta).float().numpy()
    return out


@dataclass
class QueryBank:
    """Projected training queries of each modality and the inverted softmax's beta (0: off)."""

    text: np.ndarray  # (B, D) caption queries: they correct image galleries
    image: np.ndarray  # (B, D) image queries: they correct caption galleries
    beta: float

    def bias(self, gallery: np.ndarray, modality: Modality) -> np.ndarray:
        """(G, D) unit gallery rows of `modality` -> (G,) biases against the other modality's bank."""
        return bias_from_bank(gallery, self.text if modality == "image" else self.image, self.beta)

    def info(self) -> dict:
        """What the manifest and reports record about the correction."""
        return {
            "method": "inverted softmax" if self.beta > 0 else "none",
            "beta": self.beta,
            "text_bank": len(self.text),
            "image_bank": len(self.image),
        }


def querybank_of(model) -> QueryBank:
    """The bank a model carries in its buffers; models without one (open_clip models) get an
    empty bank, whose biases are zero: plain cosine."""

    def rows(name: str) -> np.ndarray:
        bank = getattr(model, name, None)
        return np.zeros((0, 0), np.float32) if bank is None else bank.detach().float().cpu().numpy()

    return QueryBank(rows("text_bank"), rows("image_bank"), float(getattr(model, "querybank_beta", 0.0)))


def corrected_recall(
    image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray, bank: QueryBank
) -> dict[str, float]:
    """The 1K protocol over cos + gallery bias, as the index ranks cross-modal queries."""
    sims = text_vecs @ image_vecs.T  # (C, N)
    return recall_from_scores(
        sims + bank.bias(image_vecs, "image")[None, :], sims.T + bank.bias(text_vecs, "text")[None, :], caption_image
    )


def model_recall(model, image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """Recall as the service ranks: the model's own correction applied to its vectors."""
    return corrected_recall(image_vecs, text_vecs, caption_image, querybank_of(model))
