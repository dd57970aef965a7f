"""The curvature engine: operators, isolation, the Lanczos kernel and the algorithms on it.

Knows no Lightning. Data flows batch → operator (``operators.py``) → Lanczos kernel
(``krylov.py``) → eigenvalues (``lanczos.py``) or density (``density.py``); ``estimate.py`` holds
the convenience functions.
"""
