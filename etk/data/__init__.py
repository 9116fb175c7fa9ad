"""etk.data"""
