"""What filtering costs: plans and their monthly allowance (`plans`), the token tanks that
each filtered recipient draws on (`tokens`), and invoices for bought tokens (`invoices`)."""
