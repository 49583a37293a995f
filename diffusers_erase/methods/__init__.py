"""Erasure methods. Importing a module registers its method; adding a method is one module plus one line here."""

from . import advunlearn, esd, fewshot, mace, rece, safree, sld, speed, spm, uce  # noqa: F401
