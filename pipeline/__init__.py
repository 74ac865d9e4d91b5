"""What composes the stages: the in-memory engine, batch predict, the study path, its outputs and the SR.

Above stage one (models/) and stage two (stacking/), which know nothing of
each other; below the web app (web/) and the entry scripts. ARCHITECTURE.md
draws it.
"""
