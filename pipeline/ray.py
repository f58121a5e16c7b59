"""`pipeline.ray.complete(ds, **settings)`: a Ray Dataset in, the same rows with results out.

The public face of the Ray engine (`pipeline.engines.ray`); Ray itself is imported only when called.
"""

from pipeline.engines.ray import complete

__all__ = ["complete"]
