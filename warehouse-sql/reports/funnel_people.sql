-- Product view → add to cart → purchase funnel per partner and day, counted in people: who
-- viewed, who added to a cart, who bought. A device merged into a person (table identities,
-- unless an operator unlinked it since) counts as that person, so a product viewed
-- anonymously and bought after the login is one person's conversion. (funnel.sql counts
-- sessions.)
-- Parameters: start, end (YYYY-MM-DD, inclusive).
SELECT
  e.date,
  e.partner_id,
  COUNT(DISTINCT CASE WHEN e.event = 'product_view' THEN COALESCE(e.user_id, link.user_id, e.anonymous_id) END) AS viewing_people,
  COUNT(DISTINCT CASE WHEN e.event = 'add_to_cart' THEN COALESCE(e.user_id, link.user_id, e.anonymous_id) END) AS cart_people,
  COUNT(DISTINCT CASE WHEN e.event = 'purchase' THEN COALESCE(e.user_id, link.user_id, e.anonymous_id) END) AS purchase_people
FROM events AS e
LEFT JOIN (
  SELECT partner_id, anonymous_id, MIN(user_id) AS user_id
  FROM identities
  GROUP BY partner_id, anonymous_id
  HAVING SUM(CASE WHEN kind = 'unlink' THEN 1 ELSE 0 END) = 0
) AS link
  ON link.partner_id = e.partner_id AND link.anonymous_id = e.anonymous_id
WHERE e.date BETWEEN DATE '{{start}}' AND DATE '{{end}}'
GROUP BY e.date, e.partner_id
ORDER BY e.date, e.partner_id
