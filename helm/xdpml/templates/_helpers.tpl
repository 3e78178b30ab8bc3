{{/*
Chart name, truncated to 63 characters (the DNS label limit for names and label values).
*/}}
{{- define "xdpml.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified prefix for resource names. Suffixes such as "-collector" are at most
10 characters, so the prefix is cut to 52.
*/}}
{{- define "xdpml.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "xdpml.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource. Call with (dict "ctx" $ "component" "agent").
*/}}
{{- define "xdpml.labels" -}}
helm.sh/chart: {{ include "xdpml.chart" .ctx }}
{{ include "xdpml.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: xdpml
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: immutable on DaemonSets and Deployments, so never include the version.
*/}}
{{- define "xdpml.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xdpml.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "xdpml.agent.image" -}}
{{- printf "%s:%s" .Values.image.agent.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "xdpml.collector.image" -}}
{{- printf "%s:%s" .Values.image.collector.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "xdpml.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "xdpml.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "xdpml.collector.serviceAccountName" -}}
{{- if .Values.collector.serviceAccount.create }}
{{- default (printf "%s-collector" (include "xdpml.fullname" .)) .Values.collector.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.collector.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Where the agents send batches: an external address, or this release's collector Service.
*/}}
{{- define "xdpml.collectorAddress" -}}
{{- if .Values.agent.collectorAddress }}
{{- .Values.agent.collectorAddress }}
{{- else if .Values.collector.enabled }}
{{- printf "%s-collector.%s.svc:%d" (include "xdpml.fullname" .) .Release.Namespace (int .Values.collector.port) }}
{{- else }}
{{- fail "agent.collectorAddress must be set when collector.enabled is false: the agents need a collector to send batches to" }}
{{- end }}
{{- end }}

{{/*
Options of the `xdpml` command itself; they go before the subcommand.
*/}}
{{- define "xdpml.globalArgs" -}}
- --log-format={{ .Values.logging.format }}
{{- if eq .Values.logging.level "debug" }}
- --verbose
{{- end }}
{{- end }}
