{{- define "residency.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "residency.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "residency.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "residency.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "residency.selectorLabels" -}}
app.kubernetes.io/name: {{ include "residency.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "residency.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "residency.operatorServiceAccount" -}}{{ include "residency.fullname" . }}-operator{{- end -}}
{{- define "residency.workerServiceAccount" -}}{{ include "residency.fullname" . }}-worker{{- end -}}
{{- define "residency.routerServiceAccount" -}}{{ include "residency.fullname" . }}-router{{- end -}}

{{- define "residency.tokenSecret" -}}
{{- default (printf "%s-worker-token" (include "residency.fullname" .)) .Values.worker.tokenSecret -}}
{{- end -}}

{{- define "residency.modelRoots" -}}
{{- join ":" .Values.modelRoots -}}
{{- end -}}

{{/*
The model directories, read-only: the workers load from them and the operator reads their config.json and
safetensors headers to size and validate each model, so both mount the same source.
*/}}
{{- define "residency.modelsVolume" -}}
- name: models
  {{- if eq .Values.worker.models.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "worker.models.claimName is required when worker.models.source is pvc" .Values.worker.models.claimName }}
    readOnly: true
  {{- else }}
  hostPath:
    path: {{ .Values.worker.models.hostPath }}
    type: Directory
  {{- end }}
{{- end }}

{{/*
Settings the values schema cannot relate to each other: each fails the render with what to change.
*/}}
{{- define "residency.validate" -}}
{{- $mount := trimSuffix "/" .Values.worker.models.mountPath -}}
{{- range .Values.modelRoots -}}
{{- if not (or (eq (trimSuffix "/" .) $mount) (hasPrefix (printf "%s/" $mount) .)) -}}
{{- fail (printf "modelRoots entry %q is not under worker.models.mountPath %q: the operator and workers would find no model there" . $mount) -}}
{{- end -}}
{{- end -}}
{{- if eq (int .Values.operator.healthPort) (int .Values.operator.metricsPort) -}}
{{- fail (printf "operator.healthPort and operator.metricsPort are both %v: give them different ports" .Values.operator.healthPort) -}}
{{- end -}}
{{- if and .Values.worker.enabled (lt (float64 .Values.operator.heartbeatGraceSeconds) (mulf 3 (float64 .Values.worker.leaseRenewSeconds))) -}}
{{- fail (printf "operator.heartbeatGraceSeconds (%v) is under three of worker.leaseRenewSeconds (%v): one late renewal would make a live node look dead; raise the grace or renew more often" .Values.operator.heartbeatGraceSeconds .Values.worker.leaseRenewSeconds) -}}
{{- end -}}
{{- end -}}
