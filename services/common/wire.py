"""Names the services agree on at their boundaries: headers, rate-limit descriptor keys, KServe parameters.

One place, so that the edge, the gateway, the rate-limit service and the router cannot drift apart.
"""

from __future__ import annotations

# Set by Envoy only: it strips both from client requests before jwt_authn, then puts the verified tenant claim in
# the first and the shared edge secret in the second (services/edge/render.py, services/gateway/auth.py).
JWT_TENANT_HEADER = "x-mesh-jwt-tenant"
EDGE_SECRET_HEADER = "x-mesh-edge-secret"
# The verified JWT's scope claim (space-separated, RFC 8693), set and stripped the same way: the admin API
# (services/admin/gate.py) takes a JWT whose scope holds ADMIN_SCOPE.
JWT_SCOPE_HEADER = "x-mesh-jwt-scope"
ADMIN_SCOPE = "mesh:admin"
# Where a caller's credential may travel (an API key in either, or `Bearer <JWT>` in the first). A request
# carries exactly one: services/edge/render.py refuses more at the edge, services/gateway/credentials.py behind it.
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
# Gateway → router: the authenticated tenant (sticky key for canary versions when there is no session).
TENANT_HEADER = "x-mesh-tenant"
# Gateway → router, for fair queuing under overload (services/router/admission.py): the tenant's tier weight,
# the request's priority ("interactive" or "batch") and its estimated cost in tokens (prompt + max_tokens).
SHARE_WEIGHT_HEADER = "x-mesh-share-weight"
PRIORITY_HEADER = "x-mesh-priority"
COST_HEADER = "x-mesh-cost"
# A batch attempt the router stopped to free its slot for an interactive request (services/router/preemption.py):
# the detail of its ABORTED status, from the relay or in a lease's attempt report.
PREEMPTED_DETAIL = "preempted by interactive work"

# Envoy rate-limit descriptor keys (services/edge/render.py → services/ratelimit/tenants.py).
DESCRIPTOR_TENANT = "tenant"
DESCRIPTOR_API_KEY = "api_key"
DESCRIPTOR_AUTHORIZATION = "authorization"

# KServe request parameters the router reads (any KServe client may set the first two).
SESSION_PARAMETER = "mesh_session"      # sticky key for canary versions and prefix affinity
AFFINITY_PARAMETER = "mesh_affinity"    # key of the request's long shared prefix
SPILL_PARAMETER = "mesh_spill"          # router → Triton: served away from its prefix's home, do not cache it
# Router → gateway, on a stream response refusing a request it could not start in time: when to try again.
RETRY_AFTER_PARAMETER = "mesh_retry_after_s"
