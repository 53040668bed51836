"""edgeforward: store-and-forward from serial sensors to the Blynk cloud."""

__version__ = "0.1.0"
