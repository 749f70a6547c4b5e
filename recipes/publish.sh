#!/bin/sh
curl --fail-with-body -sS -X POST "$RELAY_URL/publish/events.orders.42" \
     -H "Authorization: Bearer $PUBLISH_TOKEN" \
     -H 'Sse-Event: order.shipped' \
     -H 'Idempotency-Key: order-42-shipped' \
     --data '{"status":"shipped"}'
