"""The learnable ceiling of a synthetic world: its own watching model, fitted on training rows.

The oracle (the simulation's true p_full) knows every user's tastes exactly; no model can learn
them from a few dozen views. The ceiling is what the simulation's own model reaches when it
must *estimate* each user from the training rows, given what no recommender sees: the true
scene timeline and topics of every video and the world's priors. Per user u it finds the MAP
estimate of the impatience l_u = log imp_u and the topic dislikes theta_uk = -taste_uk:

    h_u(k) = base_hazard * exp(l_u) + dislike_hazard * sigmoid(theta_uk)     (per second)
    log-likelihood of a row = -H_u(t_end) + [skipped] log h_u(k at t_end)
    priors: l_u ~ N(0, impatience_sigma^2);  theta_uk ~ (1 - q) N(-m, s^2) + q N(m, s^2)

with t_end the skip time (or the skip horizon for a full watch), q = dislike_fraction and
m = 1.8 * taste_sharpness, s = 0.6 * taste_sharpness (the mean and spread of the world's
taste magnitude sharpness * (1 + |z|)). All users are fitted at once with L-BFGS in float64.
Then P(full) = exp(-H_u(horizon)) for any row. Pure numpy / torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from frame_dist.ingest.synthetic import SKIP_HORIZON, TASTE_FLOOR, World, scene_rows

HALF_NORMAL_MEAN = math.sqrt(2.0 / math.pi)  # E|z|, z ~ N(0, 1)
HALF_NORMAL_STD = math.sqrt(1.0 - 2.0 / math.pi)  # std |z|


def _segments(world: World, videos: np.ndarray, t_end: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, topic, exposed seconds, t_end inside) for every (row, scene) pair."""
    row, _, scene, start, exposed = scene_rows(world.layout, videos, t_end)
    stop = t_end[row]
    inside = (start <= stop) & (stop < world.layout.scene_end_s[scene])
    return row, world.layout.scene_topic[scene], exposed, inside


class WorldModelFit:
    """MAP fit of every user's impatience and topic dislikes (see the module docstring)."""

    def __init__(self, world: World):
        self.world = world
        cfg = world.config
        self.log_impatience = torch.zeros(world.users.n_users, dtype=torch.float64)
        self.dislike = torch.zeros(world.users.n_users, cfg.n_topics, dtype=torch.float64)

    def _hazard(self, users: torch.Tensor, topics: torch.Tensor) -> torch.Tensor:
        cfg = self.world.config
        return (cfg.base_hazard * torch.exp(self.log_impatience[users])
                + cfg.dislike_hazard * torch.sigmoid(self.dislike[users, topics]))

    def fit(self, users: np.ndarray, videos: np.ndarray, play_time_s: np.ndarray,
            full: np.ndarray, max_iter: int = 500) -> WorldModelFit:
        """Fit on training rows: world user / video indices, play time, full-watch flag."""
        cfg, lay = self.world.config, self.world.layout
        horizon = SKIP_HORIZON * lay.duration_s[videos]
        t_end = np.where(full, horizon, np.minimum(play_time_s, horizon))
        row, topic, exposed, inside = _segments(self.world, videos, t_end)
        inside &= ~np.asarray(full, dtype=bool)[row]
        seg_users = torch.as_tensor(users[row])
        seg_topics = torch.as_tensor(topic)
        exposed_t = torch.as_tensor(exposed)
        skip = torch.as_tensor(inside)
        mean = cfg.taste_sharpness * (TASTE_FLOOR + HALF_NORMAL_MEAN)
        std = cfg.taste_sharpness * HALF_NORMAL_STD
        q = min(max(cfg.dislike_fraction, 1e-6), 1 - 1e-6)
        sigma = max(cfg.impatience_sigma, 1e-3)
        params = [self.log_impatience.requires_grad_(), self.dislike.requires_grad_()]
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter,
                                      line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            h = self._hazard(seg_users, seg_topics)
            nll = (h * exposed_t).sum() - torch.log(h[skip]).sum()
            prior_l = (self.log_impatience ** 2).sum() / (2 * sigma ** 2)
            modes = torch.stack([math.log(1 - q) - (self.dislike + mean) ** 2 / (2 * std ** 2),
                                 math.log(q) - (self.dislike - mean) ** 2 / (2 * std ** 2)])
            loss = nll + prior_l - torch.logsumexp(modes, 0).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        self.log_impatience.requires_grad_(False)
        self.dislike.requires_grad_(False)
        return self

    @torch.no_grad()
    def p_full(self, users: np.ndarray, videos: np.ndarray) -> np.ndarray:
        """(n,) P(full watch) = exp(-H_u(horizon)) under the fitted parameters."""
        horizon = SKIP_HORIZON * self.world.layout.duration_s[videos]
        row, topic, exposed, _ = _segments(self.world, videos, horizon)
        h = self._hazard(torch.as_tensor(users[row]), torch.as_tensor(topic))
        total = torch.zeros(len(videos), dtype=torch.float64)
        total.index_add_(0, torch.as_tensor(row), h * torch.as_tensor(exposed))
        return torch.exp(-total).numpy()


def world_indices(world: World, user_ids, video_ids) -> tuple[np.ndarray, np.ndarray]:
    """World user and video indices of id columns (every id must belong to the world)."""
    users = {u: i for i, u in enumerate(world.users.user_ids.tolist())}
    videos = {v: i for i, v in enumerate(world.layout.video_ids.tolist())}
    try:
        return (np.array([users[u] for u in user_ids], dtype=np.int64),
                np.array([videos[v] for v in video_ids], dtype=np.int64))
    except KeyError as exc:
        raise ValueError(f"world_indices: id {exc.args[0]!r} is not in the world") from None


def gap_closed(model: float, best_baseline: float, ceiling: float) -> float:
    """(model - best baseline) / (ceiling - best baseline); nan when the ceiling is not above."""
    span = ceiling - best_baseline
    return (model - best_baseline) / span if span > 0 else float("nan")
