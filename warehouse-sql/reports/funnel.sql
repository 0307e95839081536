-- Product view → add to cart → purchase funnel per partner and day, counted in sessions.
-- Parameters: start, end (YYYY-MM-DD, inclusive).
SELECT
  date,
  partner_id,
  COUNT(DISTINCT CASE WHEN event = 'product_view' THEN session_id END) AS viewing_sessions,
  COUNT(DISTINCT CASE WHEN event = 'add_to_cart' THEN session_id END) AS cart_sessions,
  COUNT(DISTINCT CASE WHEN event = 'purchase' THEN session_id END) AS purchase_sessions
FROM events
WHERE date BETWEEN DATE '{{start}}' AND DATE '{{end}}'
GROUP BY date, partner_id
ORDER BY date, partner_id
