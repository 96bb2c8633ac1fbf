"""Ready-made runs behind ``ddo-fast demo`` and ``ddo-fast train --preset NAME``."""
