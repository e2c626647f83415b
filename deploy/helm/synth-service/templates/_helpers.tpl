{{/*
Chart name, cut to 63 characters (the limit of a DNS label, which names and labels must fit).
*/}}
{{- define "synth-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: RELEASE-CHART, or RELEASE alone when it already contains the chart
name; cut to 63 characters.
*/}}
{{- define "synth-service.fullname" -}}
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
{{- define "synth-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "synth-service.labels" -}}
helm.sh/chart: {{ include "synth-service.chart" . }}
{{ include "synth-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpt-fl
app.kubernetes.io/component: synth-service
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: only those that never change over the release's life.
*/}}
{{- define "synth-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "synth-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount.
*/}}
{{- define "synth-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "synth-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: REPOSITORY@DIGEST when a digest is set, else REPOSITORY:TAG.
*/}}
{{- define "synth-service.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}


{{/*
Name of the models claim.
*/}}
{{- define "synth-service.modelsClaimName" -}}
{{- .Values.models.existingClaim | default (include "synth-service.suffixedName" (list . "models")) }}
{{- end }}

{{/*
The service's config file (synth.yaml): .Values.config plus the listen addresses, which are
owned by the chart (built from .Values.ports and .Values.metrics.enabled) so they always agree
with the container ports, the probes, the Service and the ServiceMonitor.
*/}}
{{- define "synth-service.configFile" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $_ := set $cfg "address" (printf "0.0.0.0:%d" (int .Values.ports.grpc)) }}
{{- $_ := set $cfg "health_address" (printf "0.0.0.0:%d" (int .Values.ports.health)) }}
{{- $_ := set $cfg "metrics_address" (ternary (printf "0.0.0.0:%d" (int .Values.ports.metrics)) "" .Values.metrics.enabled) }}
{{- toYaml $cfg }}
{{- end }}

{{/*
FULLNAME-SUFFIX within 63 characters (the full name is cut, never the suffix), for objects
that come in several per release: (list . "suffix").
*/}}
{{- define "synth-service.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "synth-service.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}
