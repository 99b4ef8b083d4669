"""The mask card's figures: RSR per relation, pruned fraction per output dimension (paper Fig. 12),
and a heatmap of the mask (Fig. 11). PNG files, written with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path

import torch

from ..plotting import plain, pyplot


def rsr_per_relation(report: dict, path: Path, title: str) -> Path:
    plt = pyplot()
    rels = sorted(report["per_relation"])
    masked = [report["per_relation"][r]["rsr"] for r in rels]
    original = [report["per_relation"][r]["original"] for r in rels]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = range(len(rels))
    ax.bar([i - 0.2 for i in x], original, width=0.4, label="original model prefers true", color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], masked, width=0.4, label="masked edited model (RSR)", color="#2a7ab9")
    ax.set_xticks(list(x), [plain(r) for r in rels], rotation=0, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(plain(title), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pruned_per_output(mask: torch.Tensor, path: Path, title: str) -> Path:
    plt = pyplot()
    fraction = (1 - mask.float()).mean(dim=1).numpy()
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.plot(fraction, lw=0.6, color="#b9442a")
    ax.set_xlabel("output dimension")
    ax.set_ylabel("pruned fraction")
    ax.set_title(plain(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(mask: torch.Tensor, path: Path, title: str, size: int = 192) -> Path:
    plt = pyplot()
    m = mask.float()[None, None]
    pooled = torch.nn.functional.adaptive_avg_pool2d(m, (min(size, m.shape[2]), min(size * 2, m.shape[3])))[0, 0]
    fig, ax = plt.subplots(figsize=(8, 4))
    im = ax.imshow(1 - pooled.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("input dimension (pooled)")
    ax.set_ylabel("output dimension (pooled)")
    ax.set_title(plain(title), fontsize=9)
    fig.colorbar(im, ax=ax, label="pruned share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
