"""The experiment layer: the analyses behind ``jacobian-lab report`` and their machinery.

It is built on the library's public API (``import jacobian_lab as jl``; its figures on
:mod:`jacobian_lab.plot`, the paper style and ``save_figure``) and nothing in the library
imports it. Modules:

* :mod:`~jacobian_lab.experiments.registry`: ``ANALYSES``, every analysis by name, in
  report order;
* one module per analysis (``gsc_across_depth``, ``pythagorean``, ``norm_preservation``,
  ``collapsing_domain``, ``jacobian_spectra``, ``path_lengths``, ``theory_validation``),
  each defining one :class:`~jacobian_lab.experiments.report.Analysis` as ``ANALYSIS``
  and run as a script by ``analyses/<name>.py``;
* :mod:`~jacobian_lab.experiments.report` (analyses, verdicts, the report page),
  :mod:`~jacobian_lab.experiments.runner` (resumable sweeps),
  :mod:`~jacobian_lab.experiments.constants` (settings shared by analyses) and
  :mod:`~jacobian_lab.experiments.cli` (the ``jacobian-lab`` command).
"""
