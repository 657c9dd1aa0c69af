"""xDS v3 type URLs in one place, so no module spells them differently."""

_PREFIX = "type.googleapis.com/"

LDS = _PREFIX + "envoy.config.listener.v3.Listener"
RDS = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CDS = _PREFIX + "envoy.config.cluster.v3.Cluster"
EDS = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
RESOURCE_WRAPPER = _PREFIX + "envoy.service.discovery.v3.Resource"
HCM_TYPE = _PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

SHORT_NAMES = {LDS: "LDS", RDS: "RDS", CDS: "CDS", EDS: "EDS"}
# LDS and CDS responses carry the complete subscribed set: absence means deletion.
STATE_OF_THE_WORLD_FULL = frozenset({LDS, CDS})
