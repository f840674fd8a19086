"""edgefleet agent: the device side, and the owner of the wire contract.

The contract modules (imported by hub and compiler) are:

- :mod:`agent.bundle`   the model bundle format and its safe reader/writer;
- :mod:`agent.protocol` MQTT payload models, binary chunk frames and size limits;
- :mod:`agent.topics`   the MQTT topic tree;
- :mod:`agent.trust`    TUF-based verification of what a device installs;
- :mod:`agent.profiles` the firmware profile schema.

The agent never imports ``hub`` or ``compiler``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
