"""Model families behind one interface (`Backbone`), the noise schedule, and the registry of families.

- `tsm_core.models.base`: ``Backbone`` and the conditioning helpers (``Cond``, ``cat_cond``, ``expand_cond``,
  ``cond_map``);
- `tsm_core.models.unets`: SD1.x/2.x, SDXL and the video UNets; `tsm_core.models.dits`: PixArt-alpha, SD3;
  `tsm_core.models.flux`: FLUX.1;
- `tsm_core.models.schedule`: ``NoiseSchedule``;
- `tsm_core.models.registry`: ``FAMILIES``, ``register_backbone``, ``kinds``, ``backbone_class``,
  ``load_backbone``.
"""

from tsm_core.routing import route_by_timestep  # noqa: F401  (re-exported: samplers use it)

from .base import Backbone, Cond, cat_cond, cond_map, expand_cond, pipeline_has_component
from .dits import PixArtBackbone, SD3Backbone
from .flux import FluxBackbone
from .registry import backbone_class, kinds, load_backbone, register_backbone, unregister_backbone
from .unets import MotionUNetBackbone, SDXLBackbone, UNetBackbone, VideoUNetBackbone, video_strip

__all__ = ["Backbone", "Cond", "FluxBackbone", "MotionUNetBackbone", "PixArtBackbone", "SD3Backbone",
           "SDXLBackbone", "UNetBackbone", "VideoUNetBackbone", "backbone_class", "cat_cond", "cond_map", "expand_cond",
           "kinds", "load_backbone", "pipeline_has_component", "register_backbone", "route_by_timestep",
           "unregister_backbone", "video_strip"]
