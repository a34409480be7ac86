#!/usr/bin/env bash
# Publishes a few incident, comment and presence events to a running Owlery, then prints
# the analytics plugin's counts. Usage: examples/publish.sh [http://127.0.0.1:8080]
set -euo pipefail
base=${1:-http://127.0.0.1:8080}
post() { curl -sS -X POST "$base/api/events" -H 'content-type: application/json' -d "$1"; echo; }

post '{"eventType": "incident.created", "source": "api", "userId": "u-1", "data": {"id": 42, "severity": "HIGH", "location": "dock-7", "title": "Forklift down"}}'
post '{"eventType": "incident.updated", "source": "api", "userId": "u-1", "data": {"id": 42, "status": "investigating"}}'
post '{"eventType": "comment.added", "source": "mobile", "userId": "u-2", "data": {"incidentId": 42, "text": "On my way"}}'
post '[{"eventType": "user.connected", "userId": "u-3"}, {"eventType": "user.joined_room", "userId": "u-3", "data": {"room": "incident:42"}}]'
post '{"eventType": "incident.created", "source": "api", "data": {"id": 43, "severity": "CRITICAL", "location": "gate-2"}}'
post '{"eventType": "incident.resolved", "source": "api", "userId": "u-1", "data": {"id": 42}}'
# A bad event: 400 with the field named, nothing appended.
post '{"eventType": 7}'
sleep 0.5
curl -sS "$base/api/plugins/analytics/query"; echo
curl -sS "$base/api/events/replay?topic=alert-events&fromOffset=0&limit=10"; echo
