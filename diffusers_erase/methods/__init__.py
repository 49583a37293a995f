"""Erasure methods. Importing a module registers its method; adding a method is one module plus one line here."""

from . import esd, rece, spm, uce  # noqa: F401
