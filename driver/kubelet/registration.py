"""The plugin-registration service kubelet's plugin watcher calls on our `-reg.sock`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from driver.kubelet.gen.pluginregistration.v1 import api_pb2 as reg_pb2
from driver.kubelet.gen.pluginregistration.v1 import api_pb2_grpc as reg_grpc

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"


@dataclass
class RegistrationState:
    """What kubelet last said about our registration; `changed` is set on every notification."""

    registered: bool | None = None
    error: str = ""
    notifications: int = 0
    changed: threading.Event = field(default_factory=threading.Event)


class RegistrationServicer(reg_grpc.RegistrationServicer):
    def __init__(
        self, driver: str, endpoint: str, versions: Sequence[str], state: RegistrationState
    ) -> None:
        self.info = reg_pb2.PluginInfo(
            type=PLUGIN_TYPE, name=driver, endpoint=endpoint, supported_versions=list(versions)
        )
        self.state = state

    def add_to(self, server: grpc.Server) -> None:
        reg_grpc.add_RegistrationServicer_to_server(self, server)

    def GetInfo(
        self, request: reg_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> reg_pb2.PluginInfo:
        return self.info

    def NotifyRegistrationStatus(
        self, request: reg_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> reg_pb2.RegistrationStatusResponse:
        self.state.registered = request.plugin_registered
        self.state.error = request.error
        self.state.notifications += 1
        self.state.changed.set()
        if request.plugin_registered:
            log.info(
                "Kubelet registered the plugin",
                extra={"driver": self.info.name, "endpoint": self.info.endpoint},
            )
        else:
            log.error(
                "Kubelet refused the plugin registration; kubelet will not call this driver until it is fixed",
                extra={"driver": self.info.name, "error": request.error},
            )
        return reg_pb2.RegistrationStatusResponse()
