{{- define "loradock.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loradock.fullname" -}}
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

{{- define "loradock.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loradock.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loradock.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "loradock.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "loradock.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loradock.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loradock.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" .Values.gpu.enabled)) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the database URL and admin key that this chart creates. */}}
{{- define "loradock.secretName" -}}
{{- include "loradock.fullname" . }}
{{- end }}

{{- define "loradock.chartSecretData" -}}
{{- if and .Values.database.url (not .Values.database.existingSecret) }}
database-url: {{ .Values.database.url | b64enc }}
{{- end }}
{{- if and .Values.auth.adminKey (not .Values.auth.existingSecret) }}
admin-key: {{ .Values.auth.adminKey | b64enc }}
{{- end }}
{{- end }}

{{- define "loradock.usesPostgres" -}}
{{- if or .Values.database.url .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{/* Most pods that can run at once: replicaCount or the autoscaler's maximum, plus the
trainer's pods when the trainer/serving split is on (it always counts as more than one). */}}
{{- define "loradock.maxReplicas" -}}
{{- $serving := .Values.replicaCount | int }}
{{- if .Values.autoscaling.enabled }}{{ $serving = .Values.autoscaling.maxReplicas | int }}{{ end }}
{{- if .Values.keda.enabled }}{{ $serving = .Values.keda.maxReplicas | int }}{{ end }}
{{- if .Values.trainer.enabled }}{{ $serving = add $serving (max 1 (.Values.trainer.replicaCount | int) (ternary (.Values.keda.trainer.maxReplicas | int) 0 .Values.keda.trainer.enabled)) }}{{ end }}
{{- $serving }}
{{- end }}

{{/* Seconds between the kubelet's decision to stop a pod and the server's forced exit. */}}
{{- define "loradock.neededGraceSeconds" -}}
{{- $drain := .Values.config.drain_seconds | default 0 }}
{{- $grace := .Values.config.shutdown_grace_seconds | default 25 }}
{{- add (ceil (addf .Values.lifecycle.preStopSleepSeconds $drain $grace) | int) 5 }}
{{- end }}

{{/*
Checks the schema also makes (kept here for `--skip-schema-validation`) and those it cannot make.
*/}}
{{- define "loradock.validate" -}}
{{- $max := include "loradock.maxReplicas" . | int }}
{{- if gt $max 1 }}
{{- if and .Values.trainer.enabled (not (include "loradock.usesPostgres" .)) }}
{{- fail "trainer.enabled (the trainer/serving split) cannot share SQLite between the trainer and the servers: set database.url or database.existingSecret (PostgreSQL)" }}
{{- end }}
{{- if not (include "loradock.usesPostgres" .) }}
{{- fail (printf "%d replicas cannot share SQLite: set database.url or database.existingSecret (PostgreSQL)" $max) }}
{{- end }}
{{- if not (hasPrefix "s3://" .Values.store.url) }}
{{- fail (printf "%d replicas cannot share the local artifact store: set store.url to s3://bucket/prefix" $max) }}
{{- end }}
{{- if and .Values.persistence.enabled (not (has "ReadWriteMany" .Values.persistence.accessModes)) }}
{{- fail (printf "%d replicas cannot mount one %v volume: disable persistence or use ReadWriteMany" $max .Values.persistence.accessModes) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas %v > autoscaling.maxReplicas %v" .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled both scale the Deployment (KEDA makes its own HorizontalPodAutoscaler): choose one" }}
{{- end }}
{{- if and .Values.keda.trainer.enabled (not .Values.trainer.enabled) }}
{{- fail "keda.trainer.enabled scales the trainer Deployment: set trainer.enabled" }}
{{- end }}
{{- if and (or .Values.keda.enabled .Values.keda.trainer.enabled) (not .Values.keda.prometheusAddress) }}
{{- fail "keda needs keda.prometheusAddress (the Prometheus that scrapes loradock, e.g. http://prometheus-operated.monitoring:9090)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.queueRows.enabled .Values.autoscaling.cpu.enabled)) }}
{{- fail "autoscaling.enabled needs a metric: autoscaling.queueRows.enabled or autoscaling.cpu.enabled" }}
{{- end }}
{{- $needed := include "loradock.neededGraceSeconds" . | int }}
{{- if and (not (kindIs "invalid" .Values.terminationGracePeriodSeconds)) (lt (int .Values.terminationGracePeriodSeconds) $needed) }}
{{- fail (printf "terminationGracePeriodSeconds %v < %d needed: lifecycle.preStopSleepSeconds + config.drain_seconds + config.shutdown_grace_seconds + 5" .Values.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- end }}
