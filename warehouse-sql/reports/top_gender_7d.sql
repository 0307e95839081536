-- The seed's daily job: each user's top gender over the 7 days ending on {{end}}, from
-- gender-bearing page visits; ties go to the alphabetically first gender.
-- Parameters: start (= end - 6 days), end (YYYY-MM-DD).
WITH visits AS (
  SELECT partner_id, user_id, gender, COUNT(*) AS visits
  FROM events
  WHERE date BETWEEN DATE '{{start}}' AND DATE '{{end}}'
    AND gender IS NOT NULL
    AND user_id IS NOT NULL
    AND event IN ('page_view', 'product_view', 'product_click', 'product_list_view', 'add_to_cart', 'wishlist')
  GROUP BY partner_id, user_id, gender
),
ranked AS (
  SELECT
    partner_id, user_id, gender, visits,
    ROW_NUMBER() OVER (PARTITION BY partner_id, user_id ORDER BY visits DESC, gender ASC) AS rn
  FROM visits
)
SELECT partner_id, user_id, gender, visits
FROM ranked
WHERE rn = 1
ORDER BY partner_id, user_id
