"""MUSE (Shi et al. 2024): the six-way evaluation of unlearning on a corpus (News or Books). ``data.py`` reads its
probe splits and turns them into tokens; ``suite.py`` measures the four per-model criteria (VerbMem, KnowMem on the
forget and retain sets, PrivLeak with the other membership attacks, ES and EM); scalability and sustainability are
ways of running the recipe (``bs_train/recipes/muse.py``).
"""

from .data import MuseData, load_muse
from .suite import evaluate_loaded, evaluate_model, mia_statistics, reference_statistics

__all__ = ["MuseData", "evaluate_loaded", "evaluate_model", "load_muse", "mia_statistics", "reference_statistics"]
