"""The forward stage: what to send to the cloud, on which path, when, and within which budget."""

from .forwarder import Forwarder
from .peers import Peers
from .state import DeviceSnapshot, DeviceState, WaitReason

__all__ = ["DeviceSnapshot", "DeviceState", "Forwarder", "Peers", "WaitReason"]
