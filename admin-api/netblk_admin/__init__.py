"""netblk admin API: REST control of netblk.ko over sysfs."""

__version__ = "0.1.0"
