"""The ``oaml`` command line: the one package that may import both wings.

``model`` (the serving core and ``model.training``) never imports ``service``; ``service`` never
imports ``model.training``. The command line sits above both: ``oaml serve`` starts the service,
``oaml train``/``calibrate``/``eval``/``prepare`` drive training and evaluation.
"""
