"""Draw docs/images/pipeline.png: the stages, what runs them, and what each commits to the store.

    .venv/bin/python docs/images/make_pipeline_diagram.py          # docs/images/pipeline.png
    .venv/bin/python docs/images/make_pipeline_diagram.py out.png  # elsewhere

Deterministic: fixed layout, Agg backend, no timestamp or software tag in the PNG, so the same
matplotlib version rebuilds the same bytes. docs/architecture.md has the same flow as a mermaid
chart; keep both in step when a stage changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("pipeline.png")
WIDTH, HEIGHT = 16.0, 7.6  # inches; data units are inches too
STAGE_COLOUR, STORE_COLOUR, INPUT_COLOUR, CORE_COLOUR = "#dbe9f6", "#fdf0d5", "#e8e8e8", "#e3f1df"
EDGE = "#3c4650"

# (stage, job, subpackage, what runs it, what it reads from the store), left to right
STAGES = [
    ("ingest", "jobs.ingest", "frame_dist.ingest",
     "driver: validate rows,\nwatch ratio, time split", "source files"),
    ("extract", "jobs.extract", "frame_dist.extract",
     "Ray Data: decode tasks\n-> ResNet-50 actor pool", "videos"),
    ("graph", "jobs.graph", "frame_dist.graph",
     "driver: clip labels,\n$\\tilde{R}^p$, $\\tilde{R}^n$, user shards",
     "interactions, frame_features"),
    ("train", "jobs.train", "frame_dist.train",
     "Ray Train + DeepSpeed:\nW workers, shards k mod W", "graph, frame_features"),
    ("evaluate", "jobs.evaluate", "frame_dist.evaluate",
     "driver: test metrics,\noracle, run report",
     "model.pt, graph, truth,\ninteractions, frame_features"),
    ("score", "jobs.score", "frame_dist.score",
     "Ray task per shard\n-> Ray Data actors, top-K",
     "model.pt, graph,\nframe_features"),
]
# what each stage commits, in the same order
OUTPUTS = [
    "tables/\nvideos, interactions\n(split), ingest_errors\n[truth, scenes]",
    "tables/\nframe_features\n(video, grid index,\n2048-d fp16), extract_errors",
    "graphs/nc=<N_c>/\nper-shard Parquet\n+ user id map\n+ _manifest.json",
    "runs/<run>/\nRay Train checkpoints,\nrun.json, model.pt,\nmetrics.json",
    "runs/<run>/\nevaluation.json,\nreport.md + plots,\nreport.json",
    "tables/\nscores\n(user_id, rank,\nvideo_id, score)",
]
X0, DX, BOX_W = 1.45, 2.62, 2.3  # stage column centres x0 + i * dx
STAGE_Y, STAGE_H = 4.3, 1.75
STORE_Y, STORE_H = 1.75, 1.55
TOP_Y, TOP_H = 6.55, 0.8


def box(ax, x: float, y: float, w: float, h: float, colour: str, dashed: bool = False,
        lw: float = 1.2) -> None:
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=colour,
                                edgecolor=EDGE, linewidth=lw,
                                linestyle="--" if dashed else "-"))


def arrow(ax, start: tuple[float, float], end: tuple[float, float], colour: str = EDGE,
          dashed: bool = False, rad: float = 0.0) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=13,
                                 linewidth=1.2, color=colour, linestyle="--" if dashed else "-",
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))


def draw() -> plt.Figure:
    fig = plt.figure(figsize=(WIDTH, HEIGHT), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, HEIGHT)
    ax.axis("off")
    xs = [X0 + i * DX for i in range(len(STAGES))]

    # inputs (top left) and the pure-torch core (top right)
    box(ax, xs[0], TOP_Y, BOX_W, TOP_H, INPUT_COLOUR)
    ax.text(xs[0], TOP_Y, "interactions + videos files\n(CSV / Parquet) or the\nsynthetic world",
            ha="center", va="center", fontsize=9)
    box(ax, xs[1], TOP_Y, BOX_W, TOP_H, INPUT_COLOUR)
    ax.text(xs[1], TOP_Y, "mp4 files\n(local path or s3://)", ha="center", va="center",
            fontsize=9)
    core_x = (xs[3] + xs[5]) / 2
    box(ax, core_x, TOP_Y, xs[5] - xs[3] + BOX_W, TOP_H, CORE_COLOUR)
    ax.text(core_x, TOP_Y + 0.14, "frame_dist.model  (pure torch: no Ray, no DeepSpeed, no I/O)",
            ha="center", va="center", fontsize=10, fontweight="bold")
    ax.text(core_x, TOP_Y - 0.2, "FRAME (eqs. 7-13), sparse propagation on 1 process or W "
            "workers, hybrid loss (14-16), metrics", ha="center", va="center", fontsize=9)
    arrow(ax, (xs[0], TOP_Y - TOP_H / 2), (xs[0], STAGE_Y + STAGE_H / 2))
    arrow(ax, (xs[1], TOP_Y - TOP_H / 2), (xs[1], STAGE_Y + STAGE_H / 2))
    for i in (3, 4, 5):
        arrow(ax, (xs[i], TOP_Y - TOP_H / 2), (xs[i], STAGE_Y + STAGE_H / 2), dashed=True)

    # the store band behind the outputs
    left, right = xs[0] - BOX_W / 2 - 0.2, xs[-1] + BOX_W / 2 + 0.2
    ax.add_patch(FancyBboxPatch((left, 0.22), right - left, STORE_Y + STORE_H / 2 - 0.02,
                                boxstyle="round,pad=0.02,rounding_size=0.15",
                                facecolor="#fffaf0", edgecolor="#b08a3e", linewidth=1.2))
    ax.text((left + right) / 2, 0.48,
            "feature store  <store.root>  (local path or s3://):  Parquet part files, "
            "each commit a new manifest written after its parts; every stage skips what is "
            "already committed", ha="center", va="center", fontsize=9.5, style="italic",
            color="#6b531f")

    for i, ((stage, job, package, runner, reads), out) in enumerate(zip(STAGES, OUTPUTS)):
        x = xs[i]
        box(ax, x, STAGE_Y, BOX_W, STAGE_H, STAGE_COLOUR, lw=1.5)
        ax.text(x, STAGE_Y + 0.62, stage, ha="center", va="center", fontsize=12.5,
                fontweight="bold")
        ax.text(x, STAGE_Y + 0.31, f"{job}  |  {package.split('.')[-1]}/", ha="center",
                va="center", fontsize=8.5, family="monospace")
        ax.text(x, STAGE_Y - 0.15, runner, ha="center", va="center", fontsize=9)
        ax.text(x, STAGE_Y - 0.6, f"reads: {reads}", ha="center", va="center", fontsize=8,
                style="italic", color="#6b531f")
        box(ax, x, STORE_Y, BOX_W, STORE_H, STORE_COLOUR)
        ax.text(x, STORE_Y, out, ha="center", va="center", fontsize=9)
        arrow(ax, (x, STAGE_Y - STAGE_H / 2), (x, STORE_Y + STORE_H / 2))  # commits
        if i + 1 < len(STAGES) - 1:  # the next stage reads it
            arrow(ax, (x + BOX_W / 2 - 0.15, STORE_Y + STORE_H / 2),
                  (xs[i + 1] - BOX_W / 2 + 0.15, STAGE_Y - STAGE_H / 2), colour="#8a6d2f")
    # score reads the trained run (model.pt), not the evaluation
    arrow(ax, (xs[3] + BOX_W / 2 - 0.15, STORE_Y + STORE_H / 2),
          (xs[5] - BOX_W / 2 + 0.15, STAGE_Y - STAGE_H / 2), colour="#8a6d2f")

    ax.text(WIDTH / 2, HEIGHT - 0.2, "frame-dist: FRAME from videos and views to the top-K "
            "videos of every user", ha="center", va="center", fontsize=13, fontweight="bold")
    ax.text(WIDTH / 2, HEIGHT - 0.48, "arrows down: what a stage commits;  diagonal: what the "
            "later stages read;  dashed: stages that run the model", ha="center", va="center",
            fontsize=9, color="#555555")
    return fig


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    fig = draw()
    # no Software/date tags: the bytes depend on the drawing only
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
