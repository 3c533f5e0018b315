"""The names a fit's options choose among; no torch, so `--help`, config files and `g2l cache plan`
read them without loading a model. Each module that implements a choice checks it has them all."""

DEFAULT_STUDENT = "vit_large_patch14_reg4_dinov2"  # Hibou-L's architecture, the G2L paper's student
LOSSES = ("logsum", "cosine", "smooth-l1", "mse")  # g2l_student.losses.LOSS_FUNCTIONS
LOGSUM_OVER = ("sample", "batch")
TARGETS = ("cls", "mean-patch", "both")
VIEW_CHOICES = ("one", "all")
HEAD_INITS = ("targets", "default")
