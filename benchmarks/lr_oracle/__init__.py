"""LR-oracle benchmark: which batch-size rule puts the learning rate where a grid search does?

Usage (from the repository root)::

    python -m benchmarks.lr_oracle                      # full run (one core, about 40 min)
    python -m benchmarks.lr_oracle --quick --out /tmp/q  # smoke test (seconds, used by the tests)
    python -m benchmarks.lr_oracle --tasks digits_cnn --seeds 0,1,2
    python -m benchmarks.lr_oracle --markdown-only benchmarks/results/lr_oracle_summary.json \\
        --fig-dir examples/results                      # the report from the committed summary
    python benchmarks/lr_oracle --quick --out /tmp/q    # the same CLI, run as a folder

A run writes ``lr_oracle.json`` (everything, megabytes: not committed), ``lr_oracle.csv`` (every
scored cell) and ``lr_oracle_summary.json`` (the score tables, curves and measurements the
report needs: committed) to ``--out``, and ``lr_oracle.md`` with one figure per task to
``--fig-dir``. ``--markdown-only`` reads either JSON; ``--rescore`` needs the full one.

The modules: :mod:`~benchmarks.lr_oracle.tasks` (data sets, ensemble models),
:mod:`~benchmarks.lr_oracle.rules` (the rules, pure functions), :mod:`~benchmarks.lr_oracle.measure`
(switch-point measurements with the library's curvature engine), :mod:`~benchmarks.lr_oracle.oracle`
(training and the lattice search), :mod:`~benchmarks.lr_oracle.scoring` (oracle and scores),
:mod:`~benchmarks.lr_oracle.report` and :mod:`~benchmarks.lr_oracle.figures` (outputs), and
``__main__`` (the command line).

What it measures, per task × optimizer × protocol × batch size B:

* **Oracle.** The learning rate is searched on a lattice of √2 steps, LR_k = anchor · 2^(k/2),
  widened until the best LR is not at either edge and the largest LR fails. Every LR is trained
  with several seeds (the full run: 3); all LRs of one seed share the initialisation and the data
  order (common random numbers), so that differences between LRs are not sampling noise. The
  final loss is the training objective on the whole training set (BatchNorm on the statistics of
  that whole set, so no running-statistics lag), at the end of the budget. ``LR*`` is the
  lattice point with the lowest mean final loss, refined by a parabola through it and its two
  neighbours in log LR (a shift of at most half a step). The **band** is the contiguous set of
  lattice LRs whose mean final loss is within 2 standard errors (√(se_best² + se²)) of the best
  one and where no seed failed, widened by half a step on each side. A run **fails (diverges)**
  if its batch loss becomes non-finite or exceeds 20 × max(L0, L_fail) (L0: the initial loss), or
  if its final loss is non-finite or above L_fail, the loss of the best constant predictor (label
  entropy for cross-entropy, label variance for MSE): it ended no better than predicting a
  constant. A failed seed counts as L_fail in the means. The **largest non-diverging LR** is the
  top of the contiguous run of non-failing lattice points above LR*.
* **Budgets** (both read from the same runs, constant LR, no schedule): *fixed-step* — S optimizer
  steps at every B; *fixed-epoch* — the samples of S steps at B0, i.e. S·B0/B steps at B (the
  same number of epochs; for the online teacher task, the same number of fresh samples).
* **Protocols**: (a) *from scratch* at each B; (b) *switch* — the callback's real use: train S steps
  at the reference batch B0 with LR*_a(B0) (the lattice optimum of (a) at B0), then change to B
  (optimizer state kept) and continue for the budget. A rule's LR is base × factor(B0 → B): in (a)
  the base is the refined LR*_a(B0) (the run at B0 is the same for both budgets), so errors are
  pure scaling errors; in (b) the base is the LR actually used before the switch, LR*_a(B0) on
  the lattice, which is what the callback multiplies. The oracle of (b) at B0 (continuing at B0)
  is reported but not scored: every rule gives factor 1 there. All measurements a rule uses are
  taken at the switch point (the state after the S steps at B0), per seed; a rule's factor is the
  geometric mean of its per-seed factors.
* **Scores** per rule over the cells B ≠ B0: mean |log2(LR_rule/LR*)|, the fraction of cells whose
  rule LR is in the band, the number of cells where the rule LR is past the largest non-diverging
  LR (half a step beyond it), and the mean loss gap (mean final loss at the rule LR, interpolated
  linearly in log LR on the lattice, minus the best mean; L_fail − best for a divergence).

Rules (each a small pure function of measured quantities; ``adaptive`` = Adam):

* ``linear`` B/B0, ``sqrt`` √(B/B0), ``none`` 1 (``lr_batch_callback.scaling_factor``).
* ``curvature`` — the library's ``rule="curvature"`` exactly as the callback does it:
  ``estimate_batch_size_law`` on the last 512 training samples (draws=3, dataset_size=N,
  tol=1e-3, max_iter=50), used only if ``r_squared_of_means`` ≥ 0.5, factor
  ``law.lr_factor(B0, B, adaptive)``; otherwise linear (SGD) / √ (Adam).
* ``direct`` — λ_max (Lanczos, ``hessian_eigenvalues``) measured on random batches of size B and
  B0: λ(B0)/λ(B), √ of it for Adam.
* ``direct_precond`` (Adam) — the same ratio of the preconditioned sharpness λ_max(P⁻¹H_B),
  P = diag(√v̂)+ε from the optimizer state (Cohen et al. 2022), not square-rooted.
* ``law_edge`` — λ(B) = a + c·x + d·√x, x = 1/B − 1/N (outlier term plus a noise-edge term
  ∝ √x, Granziol et al.), fitted to the per-size means of the curvature law's observations.
* ``noise`` (SGD) — McCandlish et al. 2018: (1 + B_noise/B0)/(1 + B_noise/B), B_noise = B_simple
  = tr Σ / |G|², from gradient norms at two batch sizes (micro-batches of min(B) and the 512 pool).
* ``noise_hess`` (SGD) / ``noise_hess_sqrt`` (Adam) — the same factor (its √ for Adam) with
  McCandlish's Hessian-weighted B_noise = tr(HΣ)/(GᵀHG) (gᵀHg of micro-batch and pool gradients,
  H the pool's Hessian): curvature information inside the noise scale.
* ``surge`` (Adam) — Li et al. 2024 (arXiv 2405.14578): ε_opt(B) = ε_max /
  (½(√(B_noise/B) + √(B/B_noise))), so the factor is
  (√(Bn/B0) + √(B0/Bn)) / (√(Bn/B) + √(B/Bn)), with Bn = McCandlish's B_simple (their B_noise is
  defined from the same gradient mean and variance; using B_simple for it is our approximation).
* ``noise_sqrt`` (Adam) — √ of the McCandlish factor: √ rule below B_noise, saturating above.
* ``guard`` — the fixed rule capped at the stability threshold at B: SGD
  min(B/B0, 2(1+μ)/(LR0·λ(B))); Adam min(√(B/B0), 38/(LR0·λ_max(P⁻¹H_B))), 38 = (2+2β1)/(1−β1).
* ``noise_guard`` (SGD) — suggested by the first full run and scored on its stored measurements
  (``--rescore``, no new training): the ``noise`` factor with the same stability cap,
  min((1 + B_simple/B0)/(1 + B_simple/B), 2(1+μ)/(LR0·λ(B))).

Everything runs in float32 on the CPU with one thread (``--threads``). Small models are trained
as *ensembles*: all LRs × seeds of one batch size are one model whose parameters carry a leading
model dimension (grouped convolutions, batched matmuls), which is exact (no parameter is shared)
and an order of magnitude faster than one model at a time for these sizes.
"""
