"""etk.interventions"""
