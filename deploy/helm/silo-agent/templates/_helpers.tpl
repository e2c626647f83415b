{{/*
Chart name, cut to 63 characters (the limit of a DNS label, which names and labels must fit).
*/}}
{{- define "silo-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: RELEASE-CHART, or RELEASE alone when it already contains the chart
name; cut to 63 characters.
*/}}
{{- define "silo-agent.fullname" -}}
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
{{- define "silo-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "silo-agent.labels" -}}
helm.sh/chart: {{ include "silo-agent.chart" . }}
{{ include "silo-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpt-fl
app.kubernetes.io/component: silo-agent
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: only those that never change over the release's life.
*/}}
{{- define "silo-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "silo-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount.
*/}}
{{- define "silo-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "silo-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: REPOSITORY@DIGEST when a digest is set, else REPOSITORY:TAG.
*/}}
{{- define "silo-agent.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The coordinator's address (required) and its port, for the NetworkPolicy.
*/}}
{{- define "silo-agent.coordinatorAddress" -}}
{{- required "coordinator.address is required: the coordinator's host:port as silos reach it, e.g. fl.example.org:443" .Values.coordinator.address }}
{{- end }}

{{- define "silo-agent.coordinatorPort" -}}
{{- if .Values.networkPolicy.coordinator.port }}
{{- .Values.networkPolicy.coordinator.port }}
{{- else }}
{{- include "silo-agent.coordinatorAddress" . | regexFind "[0-9]+$" }}
{{- end }}
{{- end }}

{{/*
Which data volume is used: "pvc", "hostPath" or "" (none, e.g. for sklearn-digits).
*/}}
{{- define "silo-agent.dataVolumeKind" -}}
{{- $v := .Values.data.volume }}
{{- if and $v.existingClaim $v.hostPath }}
{{- fail "data.volume: set existingClaim or hostPath, not both" }}
{{- else if $v.existingClaim }}pvc
{{- else if $v.hostPath }}hostPath
{{- end }}
{{- end }}

{{/*
Name of the state volume's claim ("" when the state lives in an emptyDir).
*/}}
{{- define "silo-agent.stateClaimName" -}}
{{- if .Values.state.persistence.enabled }}
{{- .Values.state.persistence.existingClaim | default (include "silo-agent.suffixedName" (list . "state")) }}
{{- end }}
{{- end }}

{{/*
The agent's config file (silo.yaml). Paths and addresses are owned by the chart so they
agree with the pod spec; the rest comes from .Values.
*/}}
{{- define "silo-agent.configFile" -}}
{{- $d := .Values.data }}
{{- $dataKind := include "silo-agent.dataVolumeKind" . }}
{{- range $split := list "train" "eval" }}
{{- $spec := get $d $split }}
{{- if and $spec (has (get $spec "kind") (list "imagefolder" "npz")) (not $dataKind) }}
{{- fail (printf "data.%s.kind %s reads files: set data.volume.existingClaim or data.volume.hostPath" $split (get $spec "kind")) }}
{{- end }}
{{- if and $spec (hasKey $spec "path") }}
{{- $mount := clean $d.volume.mountPath }}
{{- $path := clean (toString (get $spec "path")) }}
{{- if not (or (eq $path $mount) (hasPrefix (printf "%s/" (trimSuffix "/" $mount)) $path)) }}
{{- fail (printf "data.%s.path %s is not under data.volume.mountPath %s, where the data volume is mounted: the agent could not read it. Point it under %s, or change data.volume.mountPath" $split (get $spec "path") $d.volume.mountPath $d.volume.mountPath) }}
{{- end }}
{{- end }}
{{- end }}
{{- $data := dict "train" $d.train "eval_fraction" $d.eval_fraction "split_seed" $d.split_seed "resize_mode" $d.resize_mode }}
{{- if $d.eval }}
{{- $_ := set $data "eval" $d.eval }}
{{- end }}
{{- $cfg := dict
  "coordinator" (include "silo-agent.coordinatorAddress" .)
  "server_name" (.Values.coordinator.serverName | default nil)
  "tls" (dict "ca" "/etc/gptfl/tls/ca.pem" "cert" "/etc/gptfl/tls/cert.pem" "key" "/etc/gptfl/tls/key.pem")
  "insecure" false
  "state_dir" "/var/lib/gptfl-silo"
  "data" $data
  "device" .Values.config.device
  "metrics_address" (ternary (printf "0.0.0.0:%d" (int .Values.metrics.port)) "" .Values.metrics.enabled)
  "exit_after_job" false
  "log_format" .Values.config.log_format
}}
{{- /* optional agent settings: written only when set, so the agent's defaults apply */}}
{{- if hasKey .Values.config "poll_wait_s" }}
{{- $_ := set $cfg "poll_wait_s" .Values.config.poll_wait_s }}
{{- end }}
{{- $reconnect := dict }}
{{- range $key := list "initial_backoff_s" "max_backoff_s" }}
{{- if hasKey ($.Values.config.reconnect | default dict) $key }}
{{- $_ := set $reconnect $key (get $.Values.config.reconnect $key) }}
{{- end }}
{{- end }}
{{- if $reconnect }}
{{- $_ := set $cfg "reconnect" $reconnect }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
FULLNAME-SUFFIX within 63 characters (the full name is cut, never the suffix), for objects
that come in several per release: (list . "suffix").
*/}}
{{- define "silo-agent.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "silo-agent.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}
