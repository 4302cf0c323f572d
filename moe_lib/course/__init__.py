"""The course as a whole: the command line (:mod:`~moe_lib.course.cli`), the runner that executes the notebooks
(:mod:`~moe_lib.course.runner`), every notebook's first cell (:mod:`~moe_lib.course.notebook`; in Colab it fetches
the course's files through :mod:`~moe_lib.course.colab`) and the course's measured efficiency
(:mod:`~moe_lib.course.efficiency`).

Nothing is imported here: a notebook's ``import moe_lib.course.notebook`` loads only what its setup needs.
"""
