{{/*
Chart name, cut to 63 characters (the limit of a DNS label, which names and labels must fit).
*/}}
{{- define "coordinator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: RELEASE-CHART, or RELEASE alone when it already contains the chart
name; cut to 63 characters.
*/}}
{{- define "coordinator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value: NAME-VERSION.
*/}}
{{- define "coordinator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "coordinator.labels" -}}
helm.sh/chart: {{ include "coordinator.chart" . }}
{{ include "coordinator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpt-fl
app.kubernetes.io/component: coordinator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: only those that never change over the release's life (a selector is
immutable on a StatefulSet).
*/}}
{{- define "coordinator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "coordinator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount.
*/}}
{{- define "coordinator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "coordinator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: REPOSITORY@DIGEST when a digest is set, else REPOSITORY:TAG.
*/}}
{{- define "coordinator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding ca.pem, cert.pem and key.pem.
*/}}
{{- define "coordinator.tlsSecretName" -}}
{{- required "tls.existingSecret is required: the name of a Secret with ca.pem, cert.pem and key.pem (see deploy/README.md)" .Values.tls.existingSecret }}
{{- end }}

{{/*
The coordinator's config file (coordinator.yaml). Addresses, paths and the namespace are
owned by the chart so they always agree with the pod spec; the rest comes from .Values.config.
*/}}
{{- define "coordinator.configFile" -}}
{{- $c := .Values.config }}
{{- $cfg := dict
  "fleet_address" (printf "0.0.0.0:%d" (int .Values.ports.fleet))
  "admin_address" (printf "0.0.0.0:%d" (int .Values.ports.admin))
  "health_address" (printf "0.0.0.0:%d" (int .Values.ports.health))
  "metrics_address" (ternary (printf "0.0.0.0:%d" (int .Values.ports.metrics)) "" .Values.metrics.enabled)
  "tls" (dict "ca" "/etc/gptfl/tls/ca.pem" "cert" "/etc/gptfl/tls/cert.pem" "key" "/etc/gptfl/tls/key.pem")
  "insecure" false
  "state_dir" "/var/lib/gptfl"
  "admin_identities" $c.admin_identities
  "allowed_silos" $c.allowed_silos
  "heartbeat_interval_s" $c.heartbeat_interval_s
  "heartbeat_misses" $c.heartbeat_misses
  "max_workers" $c.max_workers
  "max_concurrent_uploads" $c.max_concurrent_uploads
  "upload_stall_timeout_s" $c.upload_stall_timeout_s
  "checkpoints_to_keep" $c.checkpoints_to_keep
  "shutdown_grace_s" $c.shutdown_grace_s
  "log_format" $c.log_format
  "kubernetes" (dict
    "scale_synth" $c.kubernetes.scale_synth
    "namespace" .Release.Namespace
    "deployment" $c.kubernetes.deployment
    "ready_timeout_s" $c.kubernetes.ready_timeout_s)
}}
{{- if $c.runs_dir }}
{{- $_ := set $cfg "runs_dir" $c.runs_dir }}
{{- end }}
{{- if $c.synth.address }}
{{- $synth := dict "address" $c.synth.address "server_name" nil }}
{{- if $c.synth.server_name }}
{{- $_ := set $synth "server_name" $c.synth.server_name }}
{{- end }}
{{- $_ := set $cfg "synth" $synth }}
{{- end }}
{{- if and $c.kubernetes.scale_synth (not $c.kubernetes.deployment) }}
{{- fail "config.kubernetes.deployment is required when config.kubernetes.scale_synth is true: the name of the synth-service Deployment in this namespace" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
FULLNAME-SUFFIX within 63 characters (the full name is cut, never the suffix), for objects
that come in several per release: (list . "suffix").
*/}}
{{- define "coordinator.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "coordinator.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}
