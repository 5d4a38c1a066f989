{{/* Labels every object carries; the selector labels are the stable subset. */}}
{{- define "mesh.selector" -}}
app.kubernetes.io/name: inference-mesh
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mesh.labels" -}}
{{ include "mesh.selector" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ .root.Chart.Name }}-{{ .root.Chart.Version }}
{{- end -}}

{{/* Pods on different nodes where the cluster has them (one node lost: one replica lost). */}}
{{- define "mesh.spread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "mesh.selector" . | nindent 8 }}
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "mesh.selector" . | nindent 8 }}
{{- end -}}

{{/* A probe of the service's own grpc.health.v1 over mTLS (K8s' grpc probe cannot present a certificate). */}}
{{- define "mesh.healthProbe" -}}
exec:
  command: ["python", "-m", "services.common.healthcheck", "127.0.0.1:{{ .port }}",
            "/run/mesh/pki/internal-{{ .identity }}.pem", "/run/mesh/pki/internal-{{ .identity }}-key.pem",
            "/run/mesh/pki/internal-ca.pem"]
timeoutSeconds: 5
{{- end -}}

{{/* The identity's own Secret (a pod never holds another identity's key), its files under the names the
services' TLS settings read. */}}
{{- define "mesh.identityPki" -}}
secret:
  secretName: {{ .root.Values.secrets.internalPki }}-{{ .identity }}
  defaultMode: 0440
  items:
    - {key: ca.crt, path: internal-ca.pem}
    - {key: tls.crt, path: internal-{{ .identity }}.pem}
    - {key: tls.key, path: internal-{{ .identity }}-key.pem}
{{- end -}}

{{/* Every name an identity's pods are dialled by (tools/kube/internal_pki.py dialled_names holds the same list,
and a test holds the two equal): its ClusterIP and headless Services, short and qualified; for Triton each pool's
pods by name. The bare identity is what Envoy's upstream checks match. */}}
{{- define "mesh.dialledNames" -}}
{{- $ns := .root.Release.Namespace }}
{{- $domain := .root.Values.clusterDomain }}
{{- $services := list }}
{{- if has .identity (list "gateway" "router" "cache" "retrieval" "ratelimit") }}
{{- $services = list (printf "mesh-%s" .identity) (printf "mesh-%s-pods" .identity) }}
{{- else if eq .identity "triton" }}
{{- range $name, $pool := .root.Values.pools }}{{ if $pool.enabled }}{{ $services = append $services (printf "triton-%s" $name) }}{{ end }}{{ end }}
{{- end }}
- {{ .identity }}
{{- range $service := $services }}
- {{ $service }}
- {{ $service }}.{{ $ns }}
- {{ $service }}.{{ $ns }}.svc
- {{ $service }}.{{ $ns }}.svc.{{ $domain }}
{{- if eq $.identity "triton" }}
- "*.{{ $service }}.{{ $ns }}.svc.{{ $domain }}"
{{- end }}
{{- end }}
{{- end -}}

{{/* A mesh service's headless Service as a gRPC target: the client resolves every ready pod and balances each
call over them (round_robin, services/common/channels.py); a ClusterIP would pin it to one pod. */}}
{{- define "mesh.podsTarget" -}}
dns:///mesh-{{ .name }}-pods.{{ .root.Release.Namespace }}.svc.{{ .root.Values.clusterDomain }}:{{ (get .root.Values.services .name).port }}
{{- end -}}

{{- define "mesh.preStop" -}}
lifecycle:
  preStop:
    sleep:
      seconds: {{ .Values.preStopSleepSeconds }}
{{- end -}}

{{/* repository@digest when a digest is given (production: what runs is what was scanned), else repository:tag. */}}
{{- define "mesh.image" -}}
{{- if .digest -}}{{ .repository }}@{{ .digest }}{{- else -}}{{ .repository }}:{{ .tag }}{{- end -}}
{{- end -}}

{{/* Egress to the cluster DNS, which every pod needs to find the others. */}}
{{- define "mesh.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end -}}

{{- define "mesh.namespacePeer" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ . }}
{{- end -}}

{{- define "mesh.componentPeer" -}}
- podSelector:
    matchLabels:
      {{- include "mesh.selector" . | nindent 6 }}
{{- end -}}


{{/* Pull credentials, on every pod. */}}
{{- define "mesh.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Egress to a dependency outside the namespace: its address ranges when given, else its namespace. */}}
{{- define "mesh.dependencyPeer" -}}
{{- $cidrs := get .np.egressCidrs .dependency | default list }}
{{- if $cidrs }}
{{- range $cidr := $cidrs }}
- ipBlock: {cidr: {{ $cidr }}}
{{- end }}
{{- else }}
{{- include "mesh.namespacePeer" (get .np (printf "%sNamespace" .dependency)) }}
{{- end }}
{{- end -}}
