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

{{/* One identity's files of the internal PKI Secret, and the CA certificate: whatever else the Secret holds (a
CA key, another service's key) never enters the pod, so a compromised workload can only be itself. */}}
{{- define "mesh.identityPki" -}}
secret:
  secretName: {{ .root.Values.secrets.internalTls }}
  defaultMode: 0440
  items:
    - {key: internal-ca.pem, path: internal-ca.pem}
    - {key: internal-{{ .identity }}.pem, path: internal-{{ .identity }}.pem}
    - {key: internal-{{ .identity }}-key.pem, path: internal-{{ .identity }}-key.pem}
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
